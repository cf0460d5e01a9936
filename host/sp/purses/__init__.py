"""The service provider's purse pool (issue 13, point 2): real IEP purse cards the provider
pays merchants with, leased one payment at a time, topped up from its bank and retired near
their counter's end."""
