"""The event protocol (v1): what an event is, how it is encoded and framed, and the close codes.

Shared by both sides and import-light: the flow process encodes events here, the server frames
and sends the same bytes to every client.
"""
