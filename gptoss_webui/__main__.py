import sys

from gptoss_webui.cli import main

sys.exit(main())
