"""Sub-commands of the ``memel`` CLI; each module registers its commands on ``app``."""
