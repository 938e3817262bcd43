"""Pairing's limits: how many codes may be issued and how many wrong ones tried.

The counting is archipelag/ratelimit.py's; these are the numbers and what
each is counted per. Only failed redemptions are counted, and a request over
any limit is refused before the code is even looked at, so a guesser who
hits a limit cannot keep trying even with the right code.
docs/security.md turns these numbers into odds of guessing a live code.
"""

from archipelag.ratelimit import Bucket, Limit, network_of

# Failed redemptions of desktop codes at /pair, per signed-in account.
REDEEM_PER_ACCOUNT = (
    Limit("redeem-account-15m", 5, 15 * 60, "this account"),
    Limit("redeem-account-day", 20, 24 * 3600, "this account"),
)
# Failed redemptions from one address, whoever is signed in.
REDEEM_PER_IP = (Limit("redeem-ip-hour", 30, 3600, "this address"),)
# Failed redemptions from one network (a /24 for IPv4, a /56 for IPv6: what
# one customer or one cloud tenant usually holds), so renting neighbouring
# addresses buys little. There is no service-wide budget: one that an
# attacker can fill locks out every honest user (issue 14), and what bounds
# the odds of guessing is the per-account, per-address and per-network
# arithmetic in docs/security.md.
REDEEM_PER_NETWORK = (Limit("redeem-net-hour", 90, 3600, "your network"),)
# Codes issued to one address. An Island asks once per start; a rack of
# machines behind one NAT address still fits comfortably.
ISSUE_PER_IP = (Limit("issue-ip-hour", 60, 3600, "this address"),)
ISSUE_PER_NETWORK = (Limit("issue-net-hour", 240, 3600, "your network"),)
# Codes asked for over NATS, where no address is known. Per host: the agent
# asks once per start, so ten an hour covers a person restarting it while
# troubleshooting. There is no service-wide budget: one made-up host ids can
# fill shuts pairing for every honest agent (issue 13), and codes an
# attacker asks for himself do not raise his odds of guessing an honest
# agent's code (docs/security.md). What made-up hosts can cost is memory,
# bounded instead by NATS_PENDING_CODES_MAX (the oldest unused code goes
# first) and NATS_PENDING_REGISTRATIONS_MAX (pairing/pending.py).
ISSUE_PER_HOST = (Limit("issue-host-hour", 10, 3600, "this Island"),)

# Mobile codes are their own namespace with their own budgets, so the odds
# of guessing one can be stated apart from desktop codes (docs/security.md).
# Failed mobile redemptions from one address: typed codes and scanned
# secrets alike, so an address cannot hammer either door.
MOBILE_REDEEM_PER_IP = (Limit("mobile-redeem-ip-hour", 30, 3600, "this address"),)
# Failed mobile *code* redemptions from one network (/24 or /56). Secrets
# are not counted here: 256 random bits cannot be guessed, and a guesser who
# fills it with codes must not stop neighbours scanning QR codes.
MOBILE_REDEEM_PER_NETWORK = (Limit("mobile-redeem-net-hour", 90, 3600, "your network"),)
# Mobile pairing sessions one account opens (each load of /pair/mobile).
MOBILE_OPEN_PER_ACCOUNT = (Limit("mobile-open-account-hour", 30, 3600, "this account"),)


def redeem_buckets(*, ip: str, user_id: int | None = None) -> list[Bucket]:
    buckets: list[Bucket] = []
    if user_id is not None:
        buckets += [(limit, str(user_id)) for limit in REDEEM_PER_ACCOUNT]
    buckets += [(limit, ip) for limit in REDEEM_PER_IP]
    buckets += [(limit, network_of(ip)) for limit in REDEEM_PER_NETWORK]
    return buckets


def issue_buckets(*, ip: str) -> list[Bucket]:
    buckets: list[Bucket] = [(limit, ip) for limit in ISSUE_PER_IP]
    buckets += [(limit, network_of(ip)) for limit in ISSUE_PER_NETWORK]
    return buckets


def nats_issue_buckets(*, host_id: str) -> list[Bucket]:
    return [(limit, host_id) for limit in ISSUE_PER_HOST]


def mobile_redeem_buckets(*, ip: str, by_code: bool) -> list[Bucket]:
    buckets: list[Bucket] = [(limit, ip) for limit in MOBILE_REDEEM_PER_IP]
    if by_code:
        buckets += [(limit, network_of(ip)) for limit in MOBILE_REDEEM_PER_NETWORK]
    return buckets


def mobile_open_buckets(*, user_id: int) -> list[Bucket]:
    return [(limit, str(user_id)) for limit in MOBILE_OPEN_PER_ACCOUNT]
