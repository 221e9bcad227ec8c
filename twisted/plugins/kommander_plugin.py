from twisted.application.service import ServiceMaker

kommander = ServiceMaker("kommander", "kommander.entry.tap", "Run a Kommander Raft node", "kommander")
