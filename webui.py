"""Start the web UI: `python webui.py [--host H] [--port P] [--auth user:password] [--lang zh] ...`.

The same as `python -m gptoss_webui ui`: flags are parsed by the CLI, access policy and the app live in
gptoss_webui.ui.app.
"""

import sys

from gptoss_webui.cli import main

if __name__ == "__main__":
    sys.exit(main(["ui", *sys.argv[1:]]))
