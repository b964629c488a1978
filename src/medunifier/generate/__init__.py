"""medunifier.generate"""
