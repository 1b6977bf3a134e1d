"""Views of exported graphs for people: a self-contained Netron page and a static architecture picture."""
