import sys

from meshkv.cli.main import main

sys.exit(main())
