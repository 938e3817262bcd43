"""How many account emails may be sent, and how many accounts made.

Each email limit is counted per account and per address, so neither one
account nor one victim's inbox can be flooded. Signups are counted per
client address and per network (/24 or /56), so nobody makes accounts by
the hundred to multiply the per-account limits (issue 14). Counted first
(archipelag.ratelimit.take).
"""

from archipelag.ratelimit import Bucket, Limit, network_of

CONFIRM_PER_ACCOUNT = Limit("email_confirm_account", 5, 3600, per="this account")
CONFIRM_PER_ADDRESS = Limit("email_confirm_address", 3, 3600, per="this address")
RESET_PER_ADDRESS = Limit("password_reset_address", 3, 3600, per="this address")
RESET_PER_CLIENT = Limit("password_reset_client", 10, 3600, per="this network address")

# Accounts made from one address, and from one network: a household or an
# office signs up a few people; a script making accounts by the hundred to
# multiply per-account limits does not get far.
SIGNUP_PER_ADDRESS = Limit("signup-ip-hour", 5, 3600, per="this address")
SIGNUP_PER_NETWORK = Limit("signup-net-hour", 20, 3600, per="your network")


def signup_buckets(*, ip: str) -> list[Bucket]:
    return [(SIGNUP_PER_ADDRESS, ip), (SIGNUP_PER_NETWORK, network_of(ip))]
