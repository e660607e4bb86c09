import sys

if len(sys.argv) > 1 and sys.argv[1] == "zoo":
    from .zoo import main as zoo_main

    sys.exit(zoo_main(sys.argv[2:]))

from .cases import CASES
from .harness import main

sys.exit(main(CASES))
