from dpnle.cli import main

main()
