from twisted.application.service import ServiceMaker

kommander = ServiceMaker("kommander", "kommander.tap", "Run a Kommander Raft node", "kommander")
