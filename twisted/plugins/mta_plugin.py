"""The twistd plugin: `twistd mta` runs mta.tap.makeService."""

from twisted.application.service import ServiceMaker

mta = ServiceMaker("mta", "mta.tap", "A durable mail transfer agent (SMTP in, Maildir out)", "mta")
