"""daphne's runserver, with request bodies bounded as in production (archipelag/server.py)."""

from daphne.management.commands.runserver import Command as DaphneRunserverCommand

from archipelag.server import Server


class Command(DaphneRunserverCommand):
    server_cls = Server
