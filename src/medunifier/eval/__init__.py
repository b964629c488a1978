"""medunifier.eval"""
