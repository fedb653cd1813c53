"""Print the table of model-zoo configs.

python -m deformable_family.model_zoo                    # every config
python -m deformable_family.model_zoo deformable_detr/  # the configs whose names start so
python -m deformable_family.model_zoo --names            # only the names, one per line
"""

import argparse
import sys
from typing import List, Optional

from .catalog import render_table, zoo_entries
from .model_zoo import configs_root, list_configs


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deformable_family.model_zoo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "prefixes", nargs="*", help="only the configs whose names start with one of these"
    )
    parser.add_argument("--names", action="store_true", help="print only the names, one per line")
    args = parser.parse_args(argv)
    if args.names:
        names = [
            n for n in list_configs() if not args.prefixes or n.startswith(tuple(args.prefixes))
        ]
        print("\n".join(names))
        return 0
    entries = zoo_entries(args.prefixes)
    if not entries:
        print(
            f"No config name starts with {' or '.join(args.prefixes)} (configs in {configs_root()})",
            file=sys.stderr,
        )
        return 1
    print(render_table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
