from django.db import migrations


def mark_nats_islands(apps, schema_editor):
    # Islands paired with a code asked for over NATS are the agent's: jobs
    # reach them on their NATS subject (islands' Island.transport).
    PairingCode = apps.get_model("pairing", "PairingCode")
    Island = apps.get_model("islands", "Island")
    linked = PairingCode.objects.filter(channel="nats", island__isnull=False).values("island_id")
    Island.objects.filter(pk__in=linked).update(transport="nats")


class Migration(migrations.Migration):
    dependencies = [
        ("pairing", "0002_mobile_pairing_session"),
        ("islands", "0005_job_placement_attempts_and_outbox"),
    ]

    operations = [migrations.RunPython(mark_nats_islands, migrations.RunPython.noop)]
