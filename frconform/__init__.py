"""The frproto conformance harness: scenarios that check an endpoint against the requirements of docs/protocol.md."""  # noqa: E501
