from nvfp4_ext.cli import main

raise SystemExit(main())
