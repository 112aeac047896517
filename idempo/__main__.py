import sys

from idempo.cli import main

sys.exit(main())
