"""The trading-session servers: the customer account manager, the mediating trusted agent
(the value acquirer) and the merchant agent."""
