from tuneloop.cli import main

main()
