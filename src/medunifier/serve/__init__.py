"""medunifier.serve"""
