"""Pairing's limits: how many codes may be issued and how many wrong ones tried.

The counting is archipelag/ratelimit.py's; these are the numbers and what
each is counted per. Only failed redemptions are counted, and a request over
any limit is refused before the code is even looked at, so a guesser who
hits a limit cannot keep trying even with the right code.
docs/security.md turns these numbers into odds of guessing a live code.
"""

from archipelag.ratelimit import Bucket, Limit

# Failed redemptions of desktop codes at /pair, per signed-in account.
REDEEM_PER_ACCOUNT = (
    Limit("redeem-account-15m", 5, 15 * 60, "this account"),
    Limit("redeem-account-day", 20, 24 * 3600, "this account"),
)
# Failed redemptions from one address, whoever is signed in.
REDEEM_PER_IP = (Limit("redeem-ip-hour", 30, 3600, "this address"),)
# All failed redemptions on the service in a day. This caps what a botnet
# with many accounts and addresses can try; reaching it pauses redemption
# for everyone until the window ends, which is the price of that cap.
REDEEM_GLOBAL = (Limit("redeem-global-day", 10_000, 24 * 3600, "all accounts"),)
# Codes issued to one address. An Island asks once per start; a rack of
# machines behind one NAT address still fits comfortably.
ISSUE_PER_IP = (Limit("issue-ip-hour", 60, 3600, "this address"),)
# Codes asked for over NATS, where no address is known and all Islands
# share one credential. Per host: the agent asks once per start, so ten an
# hour covers a person restarting it while troubleshooting. On the whole
# service: a code lives 10 minutes, so at most twice this budget (a burst on
# each side of a window boundary) can be live at once, whoever asks; that is
# what bounds the odds of guessing a code in docs/security.md.
ISSUE_PER_HOST = (Limit("issue-host-hour", 10, 3600, "this Island"),)
ISSUE_NATS_GLOBAL = (Limit("issue-nats-global-10m", 300, 600, "all Islands"),)

# Mobile codes are their own namespace with their own budgets, so the odds
# of guessing one can be stated apart from desktop codes (docs/security.md).
# Failed mobile redemptions from one address: typed codes and scanned
# secrets alike, so an address cannot hammer either door.
MOBILE_REDEEM_PER_IP = (Limit("mobile-redeem-ip-hour", 30, 3600, "this address"),)
# All failed mobile *code* redemptions on the service in a day. Secrets are
# not counted here: 256 random bits cannot be guessed, and a guesser who
# drains the budget with codes must not stop people scanning QR codes.
MOBILE_REDEEM_GLOBAL = (Limit("mobile-redeem-global-day", 10_000, 24 * 3600, "all addresses"),)
# Mobile pairing sessions one account opens (each load of /pair/mobile).
MOBILE_OPEN_PER_ACCOUNT = (Limit("mobile-open-account-hour", 30, 3600, "this account"),)


def redeem_buckets(*, ip: str, user_id: int | None = None) -> list[Bucket]:
    buckets: list[Bucket] = []
    if user_id is not None:
        buckets += [(limit, str(user_id)) for limit in REDEEM_PER_ACCOUNT]
    buckets += [(limit, ip) for limit in REDEEM_PER_IP]
    buckets += [(limit, "all") for limit in REDEEM_GLOBAL]
    return buckets


def issue_buckets(*, ip: str) -> list[Bucket]:
    return [(limit, ip) for limit in ISSUE_PER_IP]


def nats_issue_buckets(*, host_id: str) -> list[Bucket]:
    buckets: list[Bucket] = [(limit, host_id) for limit in ISSUE_PER_HOST]
    buckets += [(limit, "all") for limit in ISSUE_NATS_GLOBAL]
    return buckets


def mobile_redeem_buckets(*, ip: str, by_code: bool) -> list[Bucket]:
    buckets: list[Bucket] = [(limit, ip) for limit in MOBILE_REDEEM_PER_IP]
    if by_code:
        buckets += [(limit, "all") for limit in MOBILE_REDEEM_GLOBAL]
    return buckets


def mobile_open_buckets(*, user_id: int) -> list[Bucket]:
    return [(limit, str(user_id)) for limit in MOBILE_OPEN_PER_ACCOUNT]
