from distill.run import main

main()
