import sys

from stackwatch.daemon.cli import main

sys.exit(main())
