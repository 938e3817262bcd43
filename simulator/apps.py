from django.apps import AppConfig


class SimulatorConfig(AppConfig):
    """Stand-ins for real Islands, and a worked example of karma, for trying the service out.

    Kept apart from the apps the service is made of: nothing in them imports
    this, and it talks to the service the way an Island does (the simulators
    over HTTP), or through its model methods (the karma example).
    """

    name = "simulator"
