"""Writes tests/data/redaction_corpus.jsonl: the redaction test set (fixed seed, reproducible).

``python tests/data/make_redaction_corpus.py`` rewrites it; tests/unit/test_redact_corpus.py
checks that the committed file is what this script writes, then scores the redactor on it.

Each line: ``{"family", "text", "pii"}``. ``pii`` lists the strings that must not survive
redaction (a connection string's user and password both); an empty list marks a
look-alike, which must come out unchanged.
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

OUT = Path(__file__).with_name("redaction_corpus.jsonl")
PER_FAMILY = 40

_rng = random.Random(20261202)
_B64 = string.ascii_letters + string.digits


def r(alphabet: str, n: int) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


def d(n: int) -> str:
    return r(string.digits, n)


def nz(n: int) -> str:  # n digits, the first not 0 or 1
    return _rng.choice("23456789") + d(n - 1)


# --- where a value sits ---------------------------------------------------------------------
CONTEXTS = (
    "{x}", "contact: {x}", "my details are {x}, thanks", "({x})", "Igor Petrov: {x}", "see {x}.",
    "Ivanov {x} again", "reach me on {x} tomorrow", "the model printed {x} in its answer",
    "\"{x}\"", "note:\n{x}\nend", "Prev {x}", "value={x};", "— {x} —", "réponse: {x}", "電話 {x} まで",
    # no spaces around it in Chinese and Japanese; brackets, a scheme, a full stop
    "電話番号は{x}です", "联系{x}谢谢", "<{x}>", "[{x}]", "'{x}'", "Tel.: {x}", "{x}.", "ask {x}?", "{x}\t|",
)  # fmt: skip


def placed(value: str) -> str:
    return _rng.choice(CONTEXTS).format(x=value)


# --- positives --------------------------------------------------------------------------------
FIRST = ["john", "maria", "li", "ahmed", "olga", "sven", "priya", "kenji", "ana", "joe"]
LAST = ["doe", "garcia", "wei", "khan", "petrova", "berg", "nair", "sato", "silva", "bloggs"]
DOMAINS = ["example.com", "mail.example.org", "corp.example.co.uk", "example.de", "uni.example.edu", "example.io"]


def email() -> list[str]:
    sep = _rng.choice([".", "_", "-", "+", ""])
    address = f"{_rng.choice(FIRST)}{sep}{_rng.choice(LAST)}{_rng.randint(0, 99)}@{_rng.choice(DOMAINS)}"
    return [_rng.choice([address, address, address.upper(), "mailto:" + address, address.replace("@", "+news@")])]


def email_intl() -> list[str]:
    return [_rng.choice([
        "josé.garcía@exämple.de", "müller@bücher.example", "用户@例子.广告", "почта@пример.рф",
        "δοκιμή@παράδειγμα.δοκιμή", "θ.k@example.gr", "ñandú@correo.example.es", "user@xn--exmple-cua.de",
        "राम@उदाहरण.भारत", "yū.sato@例え.jp", "zoë@zoë.example.com", "çağrı@örnek.com.tr",  # noqa: RUF001
    ]) if _rng.random() < 0.5 else f"{_rng.choice(['josé', 'zoë', 'björn', 'łukasz', 'şule', 'ñoño'])}."
        f"{_rng.choice(LAST)}@{_rng.choice(['exämple.de', 'bücher.example', '例子.广告', DOMAINS[0]])}"]  # fmt: skip


def email_obfuscated() -> list[str]:
    user, last, dom = _rng.choice(FIRST), _rng.choice(LAST), _rng.choice(["example", "mail", "corp"])
    tld = _rng.choice(["com", "org", "de", "co dot uk", "io"])
    form = _rng.choice([
        f"{user} dot {last} at {dom} dot {tld}", f"{user} [at] {dom} [dot] {tld.replace(' dot ', ' [dot] ')}",
        f"{user}(at){dom}(dot){tld.replace(' dot ', '(dot)')}", f"{user}.{last} [at] {dom}.{tld.replace(' dot ', '.')}",
        f"{user} AT {dom} DOT {tld.upper()}", f"{user}@{dom} dot {tld}", f"{user} {{at}} {dom} {{dot}} com",
        f"{user}_{last} at {dom} dot {tld}", f"{user} @ {dom} . com", f"{user}[at]{dom}.{tld.replace(' dot ', '.')}",
        f"{user} [ at ] {dom} [ dot ] org",
    ])  # fmt: skip
    return [form]


def phone_us() -> list[str]:
    a, b, c = nz(3), d(3), d(4)
    return [_rng.choice([f"{a} {b} {c}", f"{a}{b}{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"({a}) {b}-{c}",
                         f"1-800-{b}-{c}", f"+1 ({a}) {b}-{c}", f"+1 {a} {b} {c}", f"+1{a}{b}{c}",
                         f"1 ({a}) {b}-{c}", f"+1-{a}-{b}-{c}", f"tel:+1{a}{b}{c}", f"({a}){b}-{c}",
                         f"+1.{a}.{b}.{c}", f"{a}-{b}-{c} x{_rng.randint(1, 9999)}",
                         f"{a}.{b}.{c} ext. {_rng.randint(1, 999)}"])]  # fmt: skip


def phone_uk() -> list[str]:
    return [
        _rng.choice(
            [
                f"07{d(3)} {d(6)}",
                f"+44 7{d(3)} {d(6)}",
                f"020 {d(4)} {d(4)}",
                f"+44 20 {d(4)} {d(4)}",
                f"07{d(9)}",
                f"(020) {d(4)} {d(4)}",
                f"0161 {d(3)} {d(4)}",
                f"+44 (0)20 {d(4)} {d(4)}",
            ]
        )
    ]


def phone_de() -> list[str]:
    if _rng.random() < 0.2:
        return [_rng.choice([f"0049 30 {d(8)}", f"+49-30-{d(8)}", f"+49 (0) 151 {d(8)}"])]
    return [
        _rng.choice(
            [
                f"030 {d(8)}",
                f"+49 30 {d(8)}",
                f"0151 {d(8)}",
                f"+49 (0)30 {d(4)} {d(4)}",
                f"030/{d(7)}",
                f"089-{d(7)}",
                f"+49 151 {d(8)}",
                f"0171 {d(3)} {d(4)}",
            ]
        )
    ]


def phone_fr() -> list[str]:
    g = " ".join(d(2) for _ in range(4))
    return [
        _rng.choice(
            [f"01 {g}", f"06 {g}", f"+33 1 {g}", f"+33 6 {g}", f"01.{g.replace(' ', '.')}", f"+33 (0)1 {g}", f"07 {g}"]
        )
    ]


def phone_in() -> list[str]:
    m = _rng.choice("6789") + d(4)
    return [
        _rng.choice(
            [f"+91 {m} {d(5)}", f"0{m} {d(5)}", f"{m}{d(5)}", f"+91-{m}{d(5)}", f"{m} {d(5)}", f"+91 22 {d(4)} {d(4)}"]
        )
    ]


def phone_br() -> list[str]:
    return [
        _rng.choice(
            [
                f"+55 11 9{d(4)}-{d(4)}",
                f"(11) 9{d(4)}-{d(4)}",
                f"(21) {nz(4)}-{d(4)}",
                f"+55 (11) 9{d(4)}-{d(4)}",
                f"+55 21 {nz(4)}-{d(4)}",
            ]
        )
    ]


def phone_jp() -> list[str]:
    return [
        _rng.choice(
            [
                f"03-{d(4)}-{d(4)}",
                f"090-{d(4)}-{d(4)}",
                f"+81 3-{d(4)}-{d(4)}",
                f"+81 90 {d(4)} {d(4)}",
                f"06-{d(4)}-{d(4)}",
                f"080{d(8)}",
            ]
        )
    ]


def phone_au() -> list[str]:
    return [
        _rng.choice(
            [
                f"(02) {d(4)} {d(4)}",
                f"04{d(2)} {d(3)} {d(3)}",
                f"+61 2 {d(4)} {d(4)}",
                f"+61 4{d(2)} {d(3)} {d(3)}",
                f"02 {d(4)} {d(4)}",
            ]
        )
    ]


def phone_other() -> list[str]:
    return [
        _rng.choice(
            [
                f"+34 6{d(2)} {d(2)} {d(2)} {d(2)}",
                f"6{d(2)} {d(2)} {d(2)} {d(2)}",
                f"+39 06 {d(4)} {d(4)}",
                f"+31 20 {d(3)} {d(4)}",
                f"+86 13{d(1)} {d(4)} {d(4)}",
                f"13{d(1)} {d(4)} {d(4)}",
                f"+41 44 {d(3)} {d(2)} {d(2)}",
                f"+52 55 {d(4)} {d(4)}",
                f"+7 495 {d(3)}-{d(2)}-{d(2)}",
                f"+27 21 {d(3)} {d(4)}",
                f"+65 {d(4)} {d(4)}",
            ]
        )
    ]


def _luhn_complete(prefix: str, length: int) -> str:
    body = prefix + d(length - len(prefix) - 1)
    total = 0
    for i, ch in enumerate(reversed(body)):
        n = int(ch)
        if i % 2 == 0:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return body + str((10 - total % 10) % 10)


def card() -> list[str]:
    number = _luhn_complete(_rng.choice(["4", "51", "55", "2221", "37", "6011"]), _rng.choice([16, 16, 15]))
    sep = _rng.choice(["", " ", "-"])
    return [sep.join(number[i : i + 4] for i in range(0, len(number), 4))]


def iban() -> list[str]:
    country, bban = _rng.choice([("DE", d(18)), ("GB", "WEST" + d(14)), ("FR", d(23)), ("CH", d(17))])
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(numeric) % 97
    raw = f"{country}{check:02d}{bban}"
    return [" ".join(raw[i : i + 4] for i in range(0, len(raw), 4)) if _rng.random() < 0.5 else raw]


def ssn() -> list[str]:
    return [f"{_rng.randint(1, 665):03d}-{_rng.randint(1, 99):02d}-{_rng.randint(1, 9999):04d}"]


def ssn_named() -> list[str]:
    a, g, n = f"{_rng.randint(1, 665):03d}", f"{_rng.randint(1, 99):02d}", f"{_rng.randint(1, 9999):04d}"
    number = _rng.choice([f"{a} {g} {n}", f"{a}{g}{n}", f"{a}-{g}-{n}"])
    return [number, _rng.choice(["SSN {x}", "ssn: {x}", "my SSN is {x}", "Social Security number {x}"])]


def ip() -> list[str]:
    if _rng.random() < 0.5:  # unicast: multicast, loopback and 0.0.0.0 say nothing of anyone
        first = _rng.choice([n for n in range(1, 224) if n != 127])
        return [".".join([str(first), *(str(_rng.randint(0, 254)) for _ in range(3))])]
    return [_rng.choice(["2001:db8::", "fe80::", "2001:0db8:85a3::"]) + f"{_rng.randint(1, 65535):x}"]


def jwt() -> list[str]:
    return [f"eyJ{r(_B64, 20)}.eyJ{r(_B64, 30)}.{r(_B64 + '-_', 40)}"]


def bearer() -> list[str]:
    token = r(_B64 + "-._", 32)
    return [token] if _rng.random() < 0.8 else [r(_B64, 24)]


def pem() -> list[str]:
    kind = _rng.choice(["RSA ", "EC ", "OPENSSH ", "", "ENCRYPTED "])
    body = "\n".join(r(_B64 + "+/", 64) for _ in range(_rng.randint(3, 8)))
    return [f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n-----END {kind}PRIVATE KEY-----"]


def cloud_key() -> list[str]:
    return [_rng.choice([
        "AKIA" + r(string.ascii_uppercase + string.digits, 16),
        r(_B64, 12) + "/" + r(_B64, 13) + "+" + r(_B64, 13),  # AWS secret access key, 40 chars
        "AIza" + r(_B64 + "_-", 35), "ya29." + r(_B64 + "_-", 60),
    ])]  # fmt: skip


def vcs_token() -> list[str]:
    return [_rng.choice([
        "ghp_" + r(_B64, 36), "gho_" + r(_B64, 36), "ghs_" + r(_B64, 36), "ghu_" + r(_B64, 36),
        "github_pat_" + r(_B64, 22) + "_" + r(_B64, 59), "glpat-" + r(_B64, 20),
    ])]  # fmt: skip


def slack() -> list[str]:
    return [_rng.choice([
        f"xoxb-{d(12)}-{d(13)}-{r(_B64, 24)}", f"xoxp-{d(12)}-{d(12)}-{d(13)}-{r('abcdef0123456789', 32)}",
        f"xapp-1-A{r(string.ascii_uppercase + string.digits, 10)}-{d(13)}-{r('abcdef0123456789', 64)}",
        f"https://hooks.slack.com/services/T{r(string.ascii_uppercase + string.digits, 8)}/"
        f"B{r(string.ascii_uppercase + string.digits, 8)}/{r(_B64, 24)}",
    ])]  # fmt: skip


def stripe() -> list[str]:
    return [_rng.choice(["sk_live_", "sk_test_", "rk_live_", "pk_live_", "whsec_"]) + r(_B64, _rng.choice([24, 32]))]


def conn_string() -> list[str]:
    user, password = _rng.choice(FIRST) + d(2), r(_B64 + "!*~", 14)
    scheme = _rng.choice(["postgres", "postgresql", "mysql", "mongodb+srv", "redis", "amqp", "https"])
    return [f"{scheme}://{user}:{password}@db{d(1)}.internal.example:5432/app", user, password]


def keyword_secret() -> list[str]:
    value = r(_B64 + "!#$%", 14)
    key = _rng.choice(["password", "passwd", "api_key", "client_secret", "secret", "API-KEY", "access_token", "pwd"])
    sep = _rng.choice(["=", ": ", " = ", '="'])
    return [f"{key}{sep}{value}", value]


POSITIVES = {
    "email": email, "email_intl": email_intl, "email_obfuscated": email_obfuscated, "phone_us": phone_us,
    "phone_uk": phone_uk, "phone_de": phone_de, "phone_fr": phone_fr, "phone_in": phone_in, "phone_br": phone_br,
    "phone_jp": phone_jp, "phone_au": phone_au, "phone_other": phone_other, "card": card, "iban": iban,
    "ssn": ssn, "ssn_named": ssn_named, "ip": ip, "jwt": jwt, "bearer": bearer, "pem": pem, "cloud_key": cloud_key,
    "vcs_token": vcs_token,
    "slack": slack, "stripe": stripe, "conn_string": conn_string, "keyword_secret": keyword_secret,
}  # fmt: skip


def positive(family: str) -> dict[str, object]:
    values = POSITIVES[family]()
    text = values[0]
    if family == "bearer":
        text = _rng.choice(["Authorization: Bearer {x}", "bearer {x}", "use Bearer {x} for it"]).format(x=text)
    elif family == "ssn_named":
        text = placed(values[1].format(x=text))
        values = values[:1]
    elif family in ("conn_string", "keyword_secret"):
        text = _rng.choice(["{x}", "DATABASE_URL={x}", "config: {x} (prod)", "it leaked {x}"]).format(x=text)
    else:
        text = placed(text)
    pii = values[1:] if family in ("conn_string", "keyword_secret") else values
    return {"family": family, "text": text, "pii": pii}


# --- look-alikes ------------------------------------------------------------------------------
def lookalike() -> tuple[str, str]:
    y, mo, da = _rng.randint(1990, 2030), _rng.randint(1, 12), _rng.randint(1, 28)
    hh, mm, ss = _rng.randint(0, 23), _rng.randint(0, 59), _rng.randint(0, 59)
    hexs = "0123456789abcdef"
    choices = {
        "version": f"v{_rng.randint(0, 20)}.{_rng.randint(0, 30)}.{_rng.randint(0, 99)}",
        "version4": f"version {_rng.randint(1, 9)}.{_rng.randint(0, 9)}.{_rng.randint(0, 99)}.{_rng.randint(0, 9999)}",
        "date_iso": f"{y}-{mo:02d}-{da:02d}",
        "date_eu": f"{da:02d}.{mo:02d}.{y}",
        "date_us": f"{mo:02d}/{da:02d}/{y}",
        "datetime": f"{y}-{mo:02d}-{da:02d}T{hh:02d}:{mm:02d}:{ss:02d}Z",
        "time": f"{hh:02d}:{mm:02d}:{ss:02d}",
        "time_short": f"at {hh:02d}:{mm:02d}",
        "price": _rng.choice(
            [
                f"${_rng.randint(1, 9999):,}.{d(2)}",
                f"€{_rng.randint(1, 999)},{d(2)}",
                f"{_rng.randint(1, 99)}.{d(2)} USD",
                f"£{_rng.randint(1000, 999999):,}",
            ]
        ),
        "order": _rng.choice(
            [
                f"order #{d(10)}",
                f"Order {d(9)}",
                f"invoice no. {d(12)}",
                f"ticket {d(3)}-{d(2)}-{d(4)}",
                f"tracking number {d(12)}",
                f"order id: {nz(10)}",
                f"ref {d(3)}-{d(3)}-{d(4)}",
            ]
        ),
        "isbn": _rng.choice(
            [
                "ISBN 978-3-16-148410-0",
                "ISBN 978-0-306-40615-7",
                "ISBN-13: 9780306406157",
                "ISBN 0-306-40615-2",
                "978-1-4028-9462-6",
                "ISBN 0306406152",
            ]
        ),
        "uuid": f"{r(hexs, 8)}-{r(hexs, 4)}-4{r(hexs, 3)}-a{r(hexs, 3)}-{r(hexs, 12)}",
        "sha": _rng.choice([r(hexs, 40), r(hexs, 7), "commit " + r(hexs, 40), r(hexs, 64)]),
        "model": _rng.choice(
            [
                "gpt-4o-2024-08-06",
                "claude-3-5-sonnet-20241022",
                "llama-3.1-70b-instruct",
                "gemini-1.5-pro-002",
                "gpt-4-0613",
                "mistral-7b-v0.3",
                "o1-2024-12-17",
                "text-embedding-3-large",
                "qwen2.5-72b",
            ]
        ),
        "number": _rng.choice(
            [
                f"{_rng.randint(1, 99)}%",
                f"{_rng.randint(1, 999)} ms",
                f"{_rng.randint(1, 64)} GB",
                f"HTTP {_rng.choice([200, 404, 500, 503])}",
                f"{_rng.randint(1, 5)}/5 stars",
                f"{_rng.randint(1000, 99999)} tokens",
                f"page {_rng.randint(1, 400)}",
                f"{_rng.uniform(-90, 90):.4f}, {_rng.uniform(-180, 180):.4f}",
                f"{_rng.randint(1, 99)} {_rng.randint(100, 999)} {_rng.randint(100, 999)} people",
            ]
        ),
        "prose": _rng.choice(
            [
                "look at the dot product",
                "meet at noon at the station",
                "visit us at example.com",
                "the answer is at line 42",
                "we met at the dot com bubble",
                "see docs.example.com/setup",
                "use the @decorator syntax",
                "ping @maria on the thread",
                "a.b.c at the end",
                "the key is to pass the token to the parser",
                "reset your password in settings",
                "the secret ingredient is salt",
                "https://example.com/path?q=1",
                "python -m pip install foo==1.2.3",
                "pk and sk columns",
                "user:group 1000:1000",
            ]
        ),
        "misc": _rng.choice(
            [
                "+1 for this idea",
                "rated 4.5/5",
                "Python 3.11.7",
                "node v18.17.1",
                "CVE-2024-3094",
                "RFC 9110",
                "error code 0x80070005",
                "PR #12345",
                "issue 4821",
                "build 20241022.1",
                "1,234,567 rows",
                "epoch 1700000000",
                "lat 37.7749, long -122.4194",
                "port 8080",
                "zip 94103-1234",
                "task-force meeting",
                "desk_lamp",
                "at 5pm at the cafe",
                "1.2.3.4-beta",
                "chapter 3.2.1",
                "12/31/2024 11:59 PM",
                "a 1080p video at 60fps",
                "ticket #123-456-7890",
                "tracking 1Z999AA10123456784",
                "o3-mini-2025-01-31",
                "gpt-4.1-nano",
                "v2.0.0-rc.1",
                "Windows 10 22H2",
                "ID: 1234567",
                "approx 3,500,000",
                "3-4 days",
                "version 10.0.19045.3803",
                "order 2024-0001-55",
                "1 000 000 €",
                "the 415 area code",
                "ratio 16:9",
                "+5 points",
                "0.0.0.0 binds all",
                "127.0.0.1 is local",
                "key insight",
                "the password field is empty",
                "token limit 4096",
                "isbn:9780306406157",
                "DOI 10.1000/182",
                "arXiv:2301.12345",
                "HTTP/1.1 200 OK",
                "the ssn field is optional",
                "at the dot",
                "meet me @ noon",
                "score 98.6%",
                "2 + 2 = 4",
            ]
        ),
        "code": _rng.choice(
            [
                "x = a @ b",
                "git rebase -i HEAD~3",
                "sha256:" + r(hexs, 64),
                "#" + r(hexs, 6),
                "0x" + r(hexs, 8),
                "len(s) > 40",
                "10.0 / 3.0 = 3.333",
                "1e-9",
                "arr[1:10:2]",
            ]
        ),
    }
    family = _rng.choice(sorted(choices))
    return family, placed(choices[family])


_MIXABLE = [f for f in POSITIVES if f not in ("pem", "conn_string", "keyword_secret", "bearer", "ssn_named")]


def mixed() -> dict[str, object]:
    """Two or three values of different families in one text, with look-alikes between them."""
    families = _rng.sample(_MIXABLE, _rng.randint(2, 3))
    values = [POSITIVES[f]()[0] for f in families]
    filler = ["and", "or call", "— version 1.2.3 —", "on 2024-08-06,", "order #123456", "then", "\n"]
    text = f" {_rng.choice(filler)} ".join(values)
    return {"family": "mixed", "text": placed(text), "pii": values}


def corpus() -> list[dict[str, object]]:
    _rng.seed(20261202)
    rows = [positive(family) for family in POSITIVES for _ in range(PER_FAMILY)]
    rows += [mixed() for _ in range(PER_FAMILY * 2)]
    for _ in range(PER_FAMILY * 30):
        family, text = lookalike()
        rows.append({"family": "lookalike_" + family, "text": text, "pii": []})
    return rows


def render() -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in corpus())


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {OUT}\n")
