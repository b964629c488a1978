"""medunifier.model"""
