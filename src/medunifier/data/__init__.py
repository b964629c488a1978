"""medunifier.data"""
