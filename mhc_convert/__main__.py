from mhc_convert.cli import main

main()
