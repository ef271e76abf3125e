"""Scores: faithfulness (LPIPS, SSIM, MS-SSIM, PSNR) now; identity and quality later."""
