import sys

from mtlcore.cli import main

sys.exit(main())
