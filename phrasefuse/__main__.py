from phrasefuse.cli import main

main()
