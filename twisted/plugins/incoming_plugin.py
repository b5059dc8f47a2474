from twisted.application.service import ServiceMaker

incoming = ServiceMaker(
    "Incoming!!", "incoming.tap", "Incoming!! upload server for large browser uploads", "incoming"
)
