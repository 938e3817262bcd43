from django.contrib import admin

from notify.models import EmailAddress


@admin.register(EmailAddress)
class EmailAddressAdmin(admin.ModelAdmin[EmailAddress]):
    list_display = ["email", "user", "confirmed", "created_at", "confirmed_at"]
    list_filter = [("confirmed_at", admin.EmptyFieldListFilter)]
    search_fields = ["email", "user__username"]
    readonly_fields = ["created_at", "confirmed_at"]

    @admin.display(boolean=True)
    def confirmed(self, obj: EmailAddress) -> bool:
        return obj.confirmed
