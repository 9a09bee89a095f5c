"""The team's PKI: certificates (:mod:`flatnet.pki.cert`), their files (:mod:`flatnet.pki.files`) and
``flatnet cert`` (:mod:`flatnet.pki.cli`). Error types live in :mod:`flatnet.pki.errors`."""
