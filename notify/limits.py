"""How many account emails may be sent: confirmation links and password resets.

Each limit is counted per account and per address, so neither one account
nor one victim's inbox can be flooded. Counted first (archipelag.ratelimit.take).
"""

from archipelag.ratelimit import Limit

CONFIRM_PER_ACCOUNT = Limit("email_confirm_account", 5, 3600, per="this account")
CONFIRM_PER_ADDRESS = Limit("email_confirm_address", 3, 3600, per="this address")
RESET_PER_ADDRESS = Limit("password_reset_address", 3, 3600, per="this address")
RESET_PER_CLIENT = Limit("password_reset_client", 10, 3600, per="this network address")
