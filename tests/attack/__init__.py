"""The attack tier: what a hostile peer or another local user tries, kept so it stays fixed.

Bad HTTP/2 frames and malformed protobuf on every gRPC endpoint, odd tokens, config bombs and
path tricks, and a second, unprivileged local user trying to read or drive what belongs to
the mesh's user. Tests here run in CI (as root, which is what lets them create that user).
"""
