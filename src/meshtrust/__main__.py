from meshtrust.cli import main

main()
