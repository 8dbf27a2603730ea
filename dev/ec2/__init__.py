"""The local EC2's additions to moto's EC2: the subnet address map and prefix delegation."""

# The codes EC2 answers when a subnet has too few free prefixes; the local EC2 answers one of them.
CAPACITY_ERRORS = ("InsufficientCidrBlocks", "InvalidParameterValue")
