from distill.features.run import main

main()
