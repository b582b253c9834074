from draft_service.train.run import main

main()
