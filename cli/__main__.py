from jobctl.main import main

main()
