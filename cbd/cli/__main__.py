from cbd.cli.main import main

main()
