from django import template

register = template.Library()


@register.filter
def gigabytes(megabytes: int | None) -> str:
    """24576 -> "24 GB"; what the agent reports in MB reads better in GB."""
    if megabytes is None:
        return ""
    return f"{round(megabytes / 1024, 1):g} GB"
