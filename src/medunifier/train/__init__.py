"""medunifier.train"""
