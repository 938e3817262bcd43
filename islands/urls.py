from django.urls import path

from islands import views

app_name = "islands"

urlpatterns = [
    path("settings", views.settings_page, name="settings"),
    path("settings/islands/<uuid:pk>", views.detail, name="detail"),
    path("settings/islands/<uuid:pk>/rename", views.rename, name="rename"),
    path("settings/islands/<uuid:pk>/remove", views.remove, name="remove"),
    path("settings/keys/<int:pk>/revoke", views.revoke_key, name="revoke-key"),
    path("settings/islands/<uuid:pk>/maintenance", views.maintenance, name="maintenance"),
    path("api/v1/islands/maintenance", views.api_maintenance, name="api-maintenance"),
    path("api/v1/islands/heartbeat", views.api_heartbeat, name="api-heartbeat"),
    path("api/v1/islands/jobs/poll", views.api_jobs_poll, name="api-jobs-poll"),
    path("api/v1/islands/jobs/<str:job_id>/status", views.api_job_status, name="api-job-status"),
    path("api/v1/jobs", views.api_jobs, name="api-jobs"),
    path("api/v1/jobs/<str:job_id>", views.api_job, name="api-job"),
    path("api/v1/jobs/<str:job_id>/cancel", views.api_job_cancel, name="api-job-cancel"),
]
