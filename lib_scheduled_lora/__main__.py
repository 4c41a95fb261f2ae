from lib_scheduled_lora.cli import main

raise SystemExit(main())
