from django.apps import AppConfig


class KarmaConfig(AppConfig):
    name = "karma"
