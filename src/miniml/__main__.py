from miniml.cli.main import main

main()
