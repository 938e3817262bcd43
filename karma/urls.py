from django.urls import path
from django.views.generic import RedirectView

from karma import views

app_name = "karma"

urlpatterns = [
    path("reference/karma", views.reference, name="reference"),
    # The public site links to /reference/karma/ with a slash.
    path("reference/karma/", RedirectView.as_view(pattern_name="karma:reference", permanent=True)),
]
